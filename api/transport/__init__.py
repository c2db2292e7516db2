"""How calls reach the application: the gRPC server and its REST mapping, the wrappers every
call of either goes through (metrics, tokens, the cap on calls in flight), TLS, reflection and
the OpenAPI document."""
