"""gRPC protocols: agent.proto (the sidecar agent) and kserve_v2.proto (the router's Open Inference
Protocol endpoint), with their generated modules (regenerate with `make protos`)."""
