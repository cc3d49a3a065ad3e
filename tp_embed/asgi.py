"""Small ASGI pieces the server's middlewares share."""


class StatusSend:
    """An ASGI `send` that remembers the status of the response it sends (500 until one starts)."""

    __slots__ = ("send", "status")

    def __init__(self, send):
        self.send, self.status = send, 500

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)
