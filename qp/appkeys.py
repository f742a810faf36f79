"""Typed keys for what the application holds for the life of the process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from qp.chats.store import ChatStore
from qp.config import Config
from qp.metrics import Metrics
from qp.policy.policy import PolicyHolder
from qp.protection.byte_budget import ByteBudget
from qp.protection.quota import DailyQuota
from qp.protection.rate_limits import RateLimiter
from qp.spend.alerts import Alerts
from qp.spend.budgets import BudgetBook, OpenStreams
from qp.spend.prices import PriceList
from qp.storage.batches import BatchWriter
from qp.storage.database import Database
from qp.storage.disk import DiskSpace

CONFIG = web.AppKey("config", Config)
DATABASE = web.AppKey("database", Database)
CHAT_STORE = web.AppKey("chat_store", ChatStore)
POLICY = web.AppKey("policy", PolicyHolder)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
# The spend ledger: completion records, written in batches.
LEDGER = web.AppKey("ledger", BatchWriter)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Route -> rate-limit class ("chats", "completion"); routes not in it are not limited.
RATE_CLASSES = web.AppKey("rate_classes", dict)
IP_SALT = web.AppKey("ip_salt", str)
METRICS = web.AppKey("metrics", Metrics)
DISK_SPACE = web.AppKey("disk_space", DiskSpace)
# Set when SIGTERM/SIGINT starts the shutdown: streams cut after it are `shutdown`.
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
# Bytes of chats each client stored today.
DAILY_QUOTA = web.AppKey("daily_quota", DailyQuota)
# Bytes of chats and request bodies held in memory at once (QP_MAX_INFLIGHT_MB).
BYTE_BUDGET = web.AppKey("byte_budget", ByteBudget)
# The wall clock budget periods roll over by (time.time; tests set the day).
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
# When the app was made, by that clock (epoch seconds).
STARTED_AT = web.AppKey("started_at", float)
# What the server's and the apps' keys spent and have reserved, per budget.
BUDGETS = web.AppKey("budgets", BudgetBook)
# Server- or app-paid streams open per client (client_max_streams).
OPEN_STREAMS = web.AppKey("open_streams", OpenStreams)
# Model prices fetched from OpenRouter's model list (the policy's [prices] win).
PRICES = web.AppKey("prices", PriceList)
# Spend alerts waiting to be POSTed to QP_ALERT_WEBHOOK_URL.
ALERTS = web.AppKey("alerts", Alerts)
