"""geometryd: video -> depth maps and 3D point maps (GeometryCrafter in Jittor), published over MQTT."""

__version__ = "0.3.1"
