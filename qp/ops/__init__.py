"""Operations: /healthz, /metrics, and the housekeeping that runs every second."""
