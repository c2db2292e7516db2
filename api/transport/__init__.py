"""How calls reach the application: the gRPC server and its REST mapping, interceptors (tokens,
the cap on calls in flight, metrics), TLS, reflection and the OpenAPI document."""
