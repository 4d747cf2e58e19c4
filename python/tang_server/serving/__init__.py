"""Processes: the uvicorn server and its workers, the drain, systemd, and tangd's inetd hand-over."""
