"""The options of the gateway's one gRPC channel to Triton, each for a failure it meets."""

from __future__ import annotations

from .settings import Settings


def channel_args(settings: Settings) -> list[tuple[str, int | str]]:
    backoff = settings.triton_reconnect_backoff_ms
    return [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        # A stopped Triton must be found again quickly once it is back, not
        # after gRPC's default backoff of up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", min(200, backoff)),
        ("grpc.min_reconnect_backoff_ms", min(200, backoff)),
        ("grpc.max_reconnect_backoff_ms", backoff),
        # Every address the target resolves to gets requests (a headless Service
        # lists one per Triton pod), and the name is resolved again when a
        # connection ends: Triton's --grpc-max-connection-age ends them, so new
        # pods are found (docs/architecture.md, "Spreading requests over Triton").
        ("grpc.lb_policy_name", settings.triton_lb_policy),
        ("grpc.dns_min_time_between_resolutions_ms", settings.triton_dns_min_interval_ms),
        # A Triton that stops answering without closing its connections (a
        # frozen process, a node gone from the network) is found by its unanswered
        # pings, not by every request waiting out its deadline (bench/keepalive.py).
        # tritonclient's own keepalive options are ignored once channel_args are
        # given, so they are set here; Triton's --grpc-keepalive-* flags permit them.
        ("grpc.keepalive_time_ms", settings.triton_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.triton_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
