"""The DIMSE edge: status codes shared by the service handlers (SCP) and the clients (SCU)."""
