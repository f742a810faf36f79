"""Typed keys for what the application holds for the life of the process."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from qp.chat_store import ChatStore
from qp.config import Config
from qp.db import Database
from qp.ledger import SpendLedger
from qp.policy import PolicyHolder

CONFIG = web.AppKey("config", Config)
DATABASE = web.AppKey("database", Database)
CHAT_STORE = web.AppKey("chat_store", ChatStore)
POLICY = web.AppKey("policy", PolicyHolder)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
LEDGER = web.AppKey("ledger", SpendLedger)
