"""The BlueZero v2 wire protocol: envelopes, nodes, sockets and a resolver.

Knows nothing of processes; could be published alone.
"""
