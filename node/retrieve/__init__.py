"""C-MOVE and C-GET as the domain sees them: which stored instances a retrieve identifier names.

No pynetdicom and no status codes here: ``node.handlers.move``/``get`` answer the requests and
``node.scu.send`` performs the C-STORE sub-operations.
"""
