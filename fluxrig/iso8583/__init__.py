"""ISO 8583: spec-driven, sans-IO message codec (moov vocabulary, Cython twin).

    from fluxrig.iso8583 import load_spec
    spec = load_spec("moov:spec87ascii")          # or a v2 spec file, a moov/pyiso8583 dict
    fields = spec.decode(raw)                     # {0: "0200", 2: "4111...", 3: "000000", ...}
    raw = spec.encode(fields)                     # bitmaps built from the keys
    print(spec.log_safe(fields))                  # PAN and track data masked

`Codec` is the best available codec class (compiled twin or pure); `CodecPy` is always the
pure one. Errors: Iso8583DecodeError (RemoteProtocolError), Iso8583EncodeError
(LocalProtocolError), SpecError (ConfigError).
"""

from fluxrig.iso8583.codec_py import Codec as CodecPy
from fluxrig.iso8583.errors import Iso8583DecodeError, Iso8583EncodeError, SpecError
from fluxrig.iso8583.masking import log_safe, mask_pan, mask_value
from fluxrig.iso8583.sdl import BASES, from_pyiso8583
from fluxrig.iso8583.spec import Spec, codec_module, load_spec

Codec = codec_module().Codec
BACKEND = "cython" if codec_module() is not codec_module("py") else "pure"

__all__ = [
    "load_spec", "Spec", "Codec", "CodecPy", "BACKEND", "BASES", "codec_module", "from_pyiso8583",
    "mask_pan", "mask_value", "log_safe", "Iso8583DecodeError", "Iso8583EncodeError", "SpecError",
]
