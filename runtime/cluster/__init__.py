"""loradock.runtime.cluster: the engine scaled out on Ray Serve (an edge, like runtime/server).

Each replica is one `Engine` on one device; the ingress is the HTTP edge's OpenAI routes over
an engine facade that sends every request to the replicas holding its adapter version (Ray
Serve's model multiplexing). Ray lives only here; nothing imports this package except the CLI.
`serve run loradock.runtime.cluster.app:build_app base=...` names the application builder.
"""
