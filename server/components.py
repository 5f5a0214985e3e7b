"""Builds each service once from the settings; nothing here is global."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from server.settings import Settings
from services.ai.base import ChatProvider
from services.ai.demo_provider import DemoProvider
from services.ai.openai_provider import OpenAIProvider
from services.auth import TokenVerifier
from services.chat_service import ChatPolicy, ChatService
from services.metrics import ChatMetrics
from services.rate_limiter import Limiter, RateLimiter
from services.store.base import ChatStore
from services.store.instrumented import InstrumentedStore
from services.store.sqlite_store import SqliteStore

if TYPE_CHECKING:
    from services.cluster.coordinator import ClusterCoordinator


def build_metrics(settings: Settings) -> ChatMetrics:
    """This server's metrics, in a registry of its own (several servers may share a process)."""
    return ChatMetrics(enabled=settings.server.metrics)


def build_provider(settings: Settings, metrics: ChatMetrics | None = None) -> ChatProvider:
    ai = settings.ai
    if ai.resolved_provider == "demo":
        return DemoProvider()
    return OpenAIProvider(
        api_key=ai.api_key,
        base_url=ai.base_url,
        model=ai.model,
        timeout_seconds=ai.request_timeout_seconds,
        max_retries=ai.max_retries,
        max_tokens=ai.max_tokens,
        on_retry=metrics.upstream_retry if metrics is not None and metrics.enabled else None,
    )


def build_store(settings: Settings) -> ChatStore:
    storage = settings.storage
    if storage.mongodb_uri:
        from services.store.mongo_store import MongoStore  # motor/pymongo only when used

        return MongoStore(storage.mongodb_uri, storage.mongodb_database, storage.mongodb_driver)
    return SqliteStore(str(settings.sqlite_file))


def build_verifier(settings: Settings) -> TokenVerifier:
    auth = settings.auth
    public_key = Path(auth.jwt_public_key_file).read_text() if auth.jwt_public_key_file else ""
    return TokenVerifier(
        secret=auth.jwt_secret,
        public_key=public_key,
        algorithms=auth.jwt_algorithms,
        audience=auth.jwt_audience,
        issuer=auth.jwt_issuer,
        user_id_claim=auth.user_id_claim,
        require_exp=auth.jwt_require_exp,
    )


def build_cluster(settings: Settings, store: ChatStore) -> tuple[ClusterCoordinator, Limiter]:
    """Cluster mode: this node's coordinator and the shared limiter, on one Redis connection pool."""
    # redis is imported only in cluster mode
    from services.cluster.coordinator import ClusterCoordinator
    from services.cluster.rate_limit import RedisRateLimiter
    from services.cluster.redis_client import Keys, connect

    cluster = settings.cluster
    redis = connect(cluster.redis_url)
    keys = Keys(cluster.key_prefix)
    limiter = RedisRateLimiter(redis, keys, settings.rate_limit.window_seconds)
    coordinator = ClusterCoordinator(redis, keys, cluster.node_id, cluster.lock_ttl_seconds, store, limiter)
    return coordinator, limiter


def build_chat_service(
    settings: Settings, provider: ChatProvider, store: ChatStore, metrics: ChatMetrics | None = None
) -> ChatService:
    if metrics is not None and metrics.enabled:
        store = InstrumentedStore(store, metrics)  # the service's calls are timed; open/close stay direct
    cluster: ClusterCoordinator | None = None
    limiter: Limiter
    if settings.cluster.enabled:
        cluster, limiter = build_cluster(settings, store)
    else:
        limiter = RateLimiter(settings.rate_limit.window_seconds)
    return ChatService(
        provider=provider,
        store=store,
        metrics=metrics,
        verifier=build_verifier(settings),
        limiter=limiter,
        cluster=cluster,
        policy=ChatPolicy(
            system_prompt=settings.ai.system_prompt,
            max_history_messages=settings.ai.max_history_messages,
            max_message_chars=settings.ai.max_message_chars,
            on_client_disconnect=settings.ai.on_client_disconnect,
            authenticated_limit=settings.rate_limit.authenticated_limit,
            anonymous_limit=settings.rate_limit.anonymous_limit,
            checkpoint_seconds=settings.storage.checkpoint_seconds,
        ),
    )
