"""Every shared object of the app under a typed key, in one place."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from audit.config import Config
from audit.engine import AuditEngine
from audit.middleware import CTX, PUBLIC, REQUEST_ID
from audit.tokens import TokenService

if TYPE_CHECKING:
    from .ai import Provider
    from .auth import Accounts
    from .chat import UserTurns

CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", AuditEngine)
TOKENS = web.AppKey("tokens", TokenService)
ACCOUNTS: web.AppKey[Accounts] = web.AppKey("accounts")
AI: web.AppKey[Provider] = web.AppKey("ai")
CLIENT = web.AppKey("client", aiohttp.ClientSession)
REGISTRY = web.AppKey("registry", CollectorRegistry)
# Chats in progress at once (each holds its document, up to 1 MiB); the others
# wait before reading theirs.
CHAT_SLOTS = web.AppKey("chat_slots", asyncio.Semaphore)
# ... of which one user's chats may hold or wait for a few at a time.
CHAT_TURNS: web.AppKey[UserTurns] = web.AppKey("chat_turns")

__all__ = ["ACCOUNTS", "AI", "CHAT_SLOTS", "CHAT_TURNS", "CLIENT", "CONFIG", "CTX", "ENGINE",
           "PUBLIC", "REGISTRY", "REQUEST_ID", "TOKENS"]
