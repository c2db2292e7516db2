"""The gRPC API: yandex.cloud.serverless.apigateway.websocket.v1.ConnectionService served
from the read model (docs/api.md)."""
