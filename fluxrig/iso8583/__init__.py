"""ISO 8583: spec-driven, sans-IO message codec (moov vocabulary, Cython twin).

    from fluxrig.iso8583 import load_spec
    spec = load_spec("moov:spec87ascii")          # or a v2 spec file, a moov/pyiso8583 dict
    fields = spec.decode(raw)                     # {0: "0200", 2: "4111...", 3: "000000", ...}
    raw = spec.encode(fields)                     # bitmaps built from the keys
    print(spec.log_safe(fields))                  # PAN and track data masked

The codec has a Cython twin (see fluxrig/_backend.py for the naming): `Codec` is the active
class, `CodecPy` the pure one, `CodecC` the compiled one (None on a pure build), and `BACKEND`
says which is active ("cython" or "pure"). Errors: Iso8583DecodeError (RemoteProtocolError),
Iso8583EncodeError (LocalProtocolError), SpecError (ConfigError).
"""

from fluxrig.iso8583.codec import BACKEND, Codec, CodecC, CodecPy, codec_module
from fluxrig.iso8583.errors import Iso8583DecodeError, Iso8583EncodeError, SpecError
from fluxrig.iso8583.masking import log_safe, mask_pan, mask_value
from fluxrig.iso8583.sdl import BASES, from_pyiso8583
from fluxrig.iso8583.spec import Spec, load_spec

__all__ = [
    "load_spec",
    "Spec",
    "Codec",
    "CodecPy",
    "CodecC",
    "BACKEND",
    "BASES",
    "codec_module",
    "from_pyiso8583",
    "mask_pan",
    "mask_value",
    "log_safe",
    "Iso8583DecodeError",
    "Iso8583EncodeError",
    "SpecError",
]
