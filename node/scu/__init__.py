"""The node as a client (SCU) of peer AEs: associations, C-ECHO, C-FIND, C-MOVE, C-GET, C-STORE.

This is an edge of the node like ``node.handlers``: it deals in pynetdicom and DIMSE statuses
and turns them into results and ``node.remote.errors`` exceptions for the rest of the node.
"""
