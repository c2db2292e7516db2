"""What the API does: ConnectionService (Get, Send, Disconnect), the connection directory and
broadcast, the API's end of the command channel, request validation and freshness."""
