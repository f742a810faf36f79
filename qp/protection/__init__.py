"""What guards the server: rate limits and blocks, client addresses, CORS, the admin check,
the in-flight byte budget and the daily storage quota."""
