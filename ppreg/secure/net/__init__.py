"""Transport: the message channel (framing, limits, byte counts), the ZeroMQ/CurveZMQ network
channel between processes, and key files."""
