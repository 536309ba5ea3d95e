"""DIMSE service handlers: read the event, call one domain function, answer with a status."""
