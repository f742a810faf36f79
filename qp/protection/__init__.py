"""What guards the server: rate limits and blocks, client addresses, CORS, the admin check,
the bound on bytes held in flight, and the daily storage quota."""
