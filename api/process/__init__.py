"""The API's processes: one server until a signal (serve), the supervisor of worker processes
sharing a port (workers), and the command-line client of a running server (client)."""
