"""The federated reasoning mesh: adapter processes behind a ZeroMQ broker that write rationales
for signals without ever holding a signal back."""
