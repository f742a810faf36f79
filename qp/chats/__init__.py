"""The chats (/api/chats): their model, handlers, copy-on-write store, SQL, cache and garbage."""
