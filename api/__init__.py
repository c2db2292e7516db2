"""The gRPC API: yandex.cloud.serverless.apigateway.websocket.v1.ConnectionService from the read model."""
