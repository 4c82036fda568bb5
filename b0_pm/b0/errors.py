"""Typed errors for malformed b0 input.

Every problem a peer can cause raises a subclass of MessageError, so the
socket layer can turn any of them into an error reply or a logged drop.
"""


class MessageError(Exception):
    """A message from a peer is malformed or not what this socket expects."""


class EnvelopeDecodeError(MessageError):
    """The envelope's header block cannot be parsed."""


class TooManyPartsError(MessageError):
    """The ZMQ message has more frames than the one a b0 envelope uses."""


class MessageTooLargeError(MessageError):
    """A frame or a decompressed part exceeds the configured maximum size."""


class CompressionError(MessageError):
    """A compressed part names an unknown algorithm or does not decompress."""


class HeaderMismatchError(MessageError):
    """header0 is not the name of the socket that received the message."""


class ContentTypeError(MessageError):
    """Content-type-0 is not the type the receiver expects."""


class PayloadDecodeError(MessageError):
    """The payload is not valid JSON (or not valid UTF-8)."""


class FieldError(MessageError):
    """The JSON decodes but a field is missing, null or of the wrong type."""
