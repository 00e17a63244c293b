"""Turning raw RFC-822 mail into the text its sender wrote.

The body is the ``text/plain`` part (``get_body(("plain",))``), decoded with its declared charset,
then UTF-8, then Latin-1 (HTML-only mail: the visible text of the text/html part). Cleaning removes what the sender did not write in this mail: quoted
replies (lines starting with ``>``) and their attribution lines ("On ... wrote:"), forwarded
originals ("-----Original Message-----" and below), PGP armour, the signature (below a ``-- ``
line) and common mailing-list footers (Mailman's ``____`` block, SourceForge and Yahoo! Groups
sponsor blocks).
"""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser

_SIG = re.compile(r"^--\s?$")
_UNDERSCORES = re.compile(r"^_{20,}\s*$")
_DASHES = re.compile(r"^-{20,}\s*$")
_YAHOO = re.compile(r"^-+ ?Yahoo! Groups Sponsor", re.IGNORECASE)
_CUT_HERE = re.compile(
    r"^(\s*-{3,}\s*Original Message\s*-{3,}\s*"
    r"|\s*-{3,}\s*Forwarded message.*"
    r"|\s*-{3,}\s*Begin forwarded message.*"
    r"|To unsubscribe from this group, send an email to:.*"
    r"|-----BEGIN PGP SIGNATURE-----)\s*$",
    re.IGNORECASE,
)
_FOOTER_HINTS = ("mailing list", "listinfo", "mailman", "unsubscribe", "sponsored by", "list info")
# An underscore rule followed by a link, an address or an advert is a footer or a signature.
_UNDERSCORE_HINTS = ("http", "www.", "@", "yahoo", "hotmail", "msn")
_LIST_URL = re.compile(r"^\s*<?https?://\S*(listinfo|mailman|/lists?/)\S*>?\s*$", re.IGNORECASE)
_QUOTE = re.compile(r"^\s*(>|\|>)")
_WROTE = re.compile(r"(wrote|writes|said)\s*:\s*$", re.IGNORECASE)
_ON_START = re.compile(r"^\s*(On|Am|Le|El)\s+\S", re.IGNORECASE)
_QUOTING = re.compile(r"^\s*Quoting\s+.+:\s*$", re.IGNORECASE)


def parse_message(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw)


def sender_address(msg: EmailMessage) -> str:
    """The normalised (lower-case, stripped) address of the From header, or "" if none."""
    try:
        value = msg.get("From")
        header = "" if value is None else str(value)
    except Exception:  # malformed header that the modern policy cannot parse
        header = str(msg.get_all("From", [""])[0] if hasattr(msg, "get_all") else "")
    if not header:
        return ""
    try:
        addresses = [a for _, a in getaddresses([header]) if a]
    except Exception:  # pragma: no cover - getaddresses is lenient
        addresses = []
    addr = addresses[0] if addresses else parseaddr(header)[1]
    return addr.strip().strip("<>").lower()


def _decode(payload: bytes, charset: str | None) -> str:
    for enc in (charset, "utf-8"):
        if not enc:
            continue
        try:
            return payload.decode(enc)
        except (LookupError, UnicodeDecodeError):
            continue
    return payload.decode("latin-1")


def _part_text(part: EmailMessage) -> str | None:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if payload is None:
        raw = part.get_payload()
        return raw if isinstance(raw, str) else None
    return _decode(payload, part.get_content_charset())


def plain_body(msg: EmailMessage, *, html_fallback: bool = True) -> str | None:
    """The decoded text/plain body; for HTML-only mail (if ``html_fallback``) the text of the
    text/html body; None if neither exists."""
    try:
        part = msg.get_body(("plain",))
    except Exception:  # broken MIME structure
        part = None
    if part is None and msg.get_content_type() == "text/plain":
        part = msg
    if part is not None:
        return _part_text(part)
    if not html_fallback:
        return None
    try:
        html_part = msg.get_body(("html",))
    except Exception:
        html_part = None
    if html_part is None and msg.get_content_type() == "text/html":
        html_part = msg
    if html_part is None:
        return None
    html = _part_text(html_part)
    return None if html is None else html_to_text(html)


class _HTMLText(HTMLParser):
    _BLOCK = {
        "p",
        "br",
        "div",
        "tr",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "blockquote",
        "pre",
        "hr",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML body (block elements become line breaks; entities decoded)."""
    parser = _HTMLText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # pragma: no cover - HTMLParser is lenient
        pass
    text = "".join(parser.out)
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return "\n".join(lines)


def _cut_index(lines: list[str]) -> int:
    """Index of the first line of the trailing block (signature, footer, forwarded original)."""
    for i, line in enumerate(lines):
        if _SIG.match(line) or _CUT_HERE.match(line) or _YAHOO.match(line):
            return i
        if _UNDERSCORES.match(line) or _DASHES.match(line):
            nxt = " ".join(lines[i + 1 : i + 7]).lower()
            hints = _FOOTER_HINTS + (_UNDERSCORE_HINTS if line.startswith("_") else ())
            if any(h in nxt for h in hints):
                return i
    return len(lines)


def _looks_like_name(line: str) -> bool:
    body = line.strip().rstrip(":")
    return "@" in body or (0 < len(body.split()) <= 4 and len(body) <= 60)


def _next_is_quote(lines: list[str], i: int) -> bool:
    for line in lines[i + 1 : i + 3]:
        if line.strip():
            return _QUOTE.match(line) is not None
    return False


def clean_body(text: str) -> str:
    """Remove quotes, attributions, signature and list footers; normalise blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    # PGP-signed bodies: drop the armour header and its Hash: line, keep the text.
    if lines and lines[0].startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        lines = lines[1:]
        while lines and (lines[0].startswith("Hash:") or not lines[0].strip()):
            lines = lines[1:]
    lines = lines[: _cut_index(lines)]
    keep = [True] * len(lines)
    for i, line in enumerate(lines):
        if _QUOTE.match(line):
            keep[i] = False
        elif _QUOTING.match(line):
            keep[i] = False
        elif _WROTE.search(line):
            # "On <date>, <name> wrote:" (possibly over two lines), or "<name> <addr> writes:"
            # right before a quoted block.
            quote_next = _next_is_quote(lines, i)
            two_line = (
                quote_next
                and i > 0
                and _ON_START.match(lines[i - 1]) is not None
                and len(line) <= 80
            )
            if _ON_START.match(line) or two_line or quote_next:
                keep[i] = False
                if two_line:
                    keep[i - 1] = False
        elif line.rstrip().endswith(":") and _next_is_quote(lines, i) and _looks_like_name(line):
            keep[i] = False  # "Eugene Leitl:" / "John <j@x.org>:" right before a quote
    out = [ln for ln, k in zip(lines, keep, strict=True) if k]
    # A bare list-info link at the very end (FoRK and similar lists add only that).
    while out and (not out[-1].strip() or _LIST_URL.match(out[-1])):
        out.pop()
    # Collapse runs of blank lines and strip the ends.
    result: list[str] = []
    for ln in out:
        if not ln.strip():
            if result and result[-1] == "":
                continue
            result.append("")
        else:
            result.append(ln)
    return "\n".join(result).strip()


def mail_text(raw: bytes) -> tuple[str, str | None]:
    """``(sender, cleaned body)`` of a raw message; the body is None without a text/plain part."""
    msg = parse_message(raw)
    body = plain_body(msg)
    return sender_address(msg), (None if body is None else clean_body(body))
