"""The standalone application `run.py` serves: a ChatServer's routes at the root."""

from __future__ import annotations

import tornado.web

from handlers.api_base import NotFoundHandler
from server.access_log import log_request
from server.embedding import ChatServer
from server.socketio_server import MAX_FRAME_BYTES


def build_web_application(chat: ChatServer) -> tornado.web.Application:
    """The chat at "/", every other path a JSON 404; the same routes a host mounts."""
    return tornado.web.Application(
        chat.routes(""),
        default_handler_class=NotFoundHandler,
        default_handler_args=chat.handler_args,
        websocket_max_message_size=MAX_FRAME_BYTES,
        compress_response=False,
        log_function=log_request,  # no query strings in the access log
    )
