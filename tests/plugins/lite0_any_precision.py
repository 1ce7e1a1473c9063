"""efficientnet-lite0 under another name, offering every precision (tests only).

The built-in encoder offers fp32 alone: on imagenette its bf16 and int8
neighbours fall short of fp32's (see the README).  The bf16 and int8
machinery itself (NNCF calibration on the user's images, the manifest, the
cache) is still tested on this real network through this plugin, the way a
third-party encoder that offers them would use it.
"""

from imgsearch_efficientnet_lite0 import EfficientNetLite0Encoder


class Lite0AnyPrecision(EfficientNetLite0Encoder):
    name = "lite0-any-precision"
    description = "efficientnet-lite0 offering fp32, bf16 and int8 (tests only)"
    precisions = ("fp32", "bf16", "int8")
    precision_notes = {}


def register_encoders(register):
    register(Lite0AnyPrecision)
