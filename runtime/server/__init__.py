"""loradock.runtime.server: the gRPC edge of the engine (protobuf lives only here and in proto/)."""
