"""History API: read, list and delete sessions."""

from __future__ import annotations

from datetime import datetime

from handlers.api_base import ApiHandler
from services.errors import ChatError
from services.store.base import MessageRecord, SessionRecord


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def message_json(message: MessageRecord) -> dict[str, object]:
    return {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "createdAt": _iso(message.created_at),
    }


def session_json(session: SessionRecord) -> dict[str, object]:
    return {"sessionId": session.id, "messages": [message_json(m) for m in session.messages]}


class SessionHandler(ApiHandler):
    async def get(self, session_id: str) -> None:
        try:
            session = await self.chat.get_session(session_id, self.caller())
        except ChatError as error:
            return self.send_chat_error(error)
        self.send_json(session_json(session))

    async def delete(self, session_id: str) -> None:
        try:
            await self.chat.delete_session(session_id, self.caller())
        except ChatError as error:
            return self.send_chat_error(error)
        self.set_status(204)
        self.finish()


class SessionListHandler(ApiHandler):
    async def get(self) -> None:
        try:
            sessions = await self.chat.list_sessions(self.caller())
        except ChatError as error:
            return self.send_chat_error(error)
        self.send_json({
            "sessions": [
                {"sessionId": s.id, "title": s.title, "updatedAt": _iso(s.updated_at), "messageCount": s.message_count}
                for s in sessions
            ]
        })


class CancelHandler(ApiHandler):
    async def post(self, session_id: str) -> None:
        try:
            generation = await self.chat.cancel(session_id, self.caller())
        except ChatError as error:
            return self.send_chat_error(error)
        self.send_json({"sessionId": generation.session_id, "messageId": generation.message_id,
                        "cancelled": True}, 202)
