"""The gateway to Redis: transport, key names, and one typed method per Lua script."""
