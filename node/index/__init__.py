"""The four-level index: tables, database connection, and the writer C-STORE uses."""
