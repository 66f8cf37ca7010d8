"""MetaTrader 5 bridge over ZeroMQ."""
