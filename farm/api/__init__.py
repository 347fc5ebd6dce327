"""The HTTP gateway: an OpenAI-compatible ``/v1/videos`` API in front of the job store.

Import :mod:`farm.api.app` for ``create_app`` and ``GatewayDeps``; this package module
imports nothing, so ``farm.api.errors`` and ``farm.api.schemas`` stay cheap to use alone.
"""
