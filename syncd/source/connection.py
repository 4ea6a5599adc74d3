"""Connection settings for the Kafka clients: the consumer and the dead-letter producer reach
the same cluster the same way (bootstrap servers, TLS, SASL)."""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from syncd.config import KafkaConfig


def client_options(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection settings shared by the consumer and the dead-letter producer."""
    options: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=cfg.ssl_cafile or None,
            certfile=cfg.ssl_certfile or None,
            keyfile=cfg.ssl_keyfile or None,
        )
    if cfg.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = cfg.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = cfg.sasl_username
        options["sasl_plain_password"] = cfg.sasl_password
    return options
