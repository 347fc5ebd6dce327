"""Keep a replica's own gRPC server on the node's address.

Ray Serve (2.60) starts an inter-deployment gRPC server in every replica bound to
``[::]:0`` — every interface — whatever address the node has. On a one-machine farm the
node's address is loopback (``cluster.node_address``), and that server must not listen
beyond it. Each farm deployment calls :func:`bind_replica_grpc_to_node_address` first
thing in ``__init__``, which Serve runs before it starts that server: on a loopback node
the bind address becomes the node's; on any other node nothing changes. If a Ray release
moves the hook, this does nothing and the farm's socket test
(``tests/serve/test_farm_up.py``) fails, naming the socket.
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)
_ALL_INTERFACES = "[::]:"


def bind_replica_grpc_to_node_address() -> None:
    import ray
    from ray.serve._private import replica

    node = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node).is_loopback:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        log.warning("ray.serve._private.replica has no add_port_to_grpc_server; replica gRPC binds as Serve chooses")
        return
    if getattr(original, "farm_node_address", None) == node:
        return

    def add_port_on_node(server, address: str):
        if address.startswith(_ALL_INTERFACES):
            address = f"{node}:{address.removeprefix(_ALL_INTERFACES)}"
        return original(server, address)

    add_port_on_node.farm_node_address = node
    replica.add_port_to_grpc_server = add_port_on_node
