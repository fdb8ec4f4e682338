"""The MQTT schema both sides speak: payload encodings (encoding.py) and the reference subscriber
(subscribe.py)."""
