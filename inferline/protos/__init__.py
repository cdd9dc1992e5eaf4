"""gRPC/protobuf definitions and their generated code (committed, so runtime needs no grpcio-tools).

`agent.proto` is the agent's control API. After editing a `.proto`, regenerate with
`python -m inferline.protos.generate` (needs the dev tools grpcio-tools and mypy-protobuf).
"""
