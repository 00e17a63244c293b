"""Mail cleaning on synthetic RFC-822 messages, and builtin:spam-ham on a synthetic mini-corpus."""

from __future__ import annotations

import json

from pmixed.assets import ASSETS, MARKER
from pmixed.data.mail import clean_body, mail_text
from pmixed.data.sources import load_records

REPLY = b"""\
From: "Doe, John" <John.Doe@Example.COM>
To: list@lists.example.org
Subject: Re: [list] weekend plans
Date: Thu, 22 Aug 2002 13:52:38 +0100
Content-Type: text/plain; charset=us-ascii

I think we should go hiking on Saturday.
The weather looks good.

On Wed, 21 Aug 2002, Jane Roe wrote:
> Does anyone want to do something this weekend?
> I am free on Saturday.
>> older quote

Bring water.

Quoting Bob:
> inner quote

Eugene Leitl:
> one more quote

--=20
John Doe | example.org
Phone: 555 0100

_______________________________________________
List mailing list
List@lists.example.org
https://lists.example.org/mailman/listinfo/list
"""


def test_reply_quote_attribution_and_signature_are_removed():
    sender, body = mail_text(REPLY.replace(b"--=20", b"-- "))
    assert sender == "john.doe@example.com"
    assert (
        body == "I think we should go hiking on Saturday.\nThe weather looks good.\n\nBring water."
    )


def test_two_line_attribution_and_mailman_footer_without_signature():
    text = (
        "Sounds good.\n\nOn Tue, Aug 20, 2002 at 10:00:00AM -0700, Some Body\n  wrote:\n"
        "> quoted\n\nSee you.\n\n_______________________________________________\n"
        "Foo mailing list\nFoo@lists.example.org\nhttps://lists.example.org/mailman/listinfo/foo\n"
    )
    assert clean_body(text) == "Sounds good.\n\nSee you."


def test_sponsor_footers_and_forwarded_original_are_removed():
    yahoo = (
        "Real text.\n\n------------------------ Yahoo! Groups Sponsor ---------------------~-->\n"
        "Ad\n---------------------------------------------------------------------~->\n\n"
        "To unsubscribe from this group, send an email to:\nx-unsubscribe@egroups.com\n"
    )
    assert clean_body(yahoo) == "Real text."
    sf = "Text here.\n\n-------------------------------------------------------\nThis sf.net email is sponsored by: X\n"
    assert clean_body(sf) == "Text here."
    outlook = "Top post.\n\n-----Original Message-----\nFrom: a@b.c\nSubject: x\n\nOld text.\n"
    assert clean_body(outlook) == "Top post."
    fork = "Short note.\n\nhttp://xent.com/mailman/listinfo/fork\n"
    assert clean_body(fork) == "Short note."
    yahoo_uk = "Try tar.\n\n- Matthew\n\n" + "_" * 50 + "\nDo You Yahoo!?\nhttp://uk.my.yahoo.com\n"
    assert clean_body(yahoo_uk) == "Try tar.\n\n- Matthew"
    # a separator line that is not a footer stays
    table = "Results:\n--------------------------\n1. first\n2. second\n"
    assert clean_body(table) == table.strip()


def test_multipart_prefers_plain_and_latin1_fallback_and_html_only():
    multipart = (
        b"From: Anna <anna@x.org>\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/alternative; boundary="BB"\n\n'
        b"--BB\nContent-Type: text/html\n\n<p>html version</p>\n"
        b"--BB\nContent-Type: text/plain\n\nplain caf\xe9 version\n--BB--\n"
    )
    sender, body = mail_text(multipart)
    assert sender == "anna@x.org"
    assert body == "plain caf\u00e9 version"  # no charset, not UTF-8 -> latin-1
    utf8 = b"From: b@x.org\nContent-Type: text/plain\n\ncaf\xc3\xa9\n"
    assert mail_text(utf8)[1] == "caf\u00e9"
    html_only = (
        b"From: c@x.org\nContent-Type: text/html; charset=utf-8\n\n"
        b"<html><head><style>p{}</style></head><body><p>Hello&nbsp;there</p><p>Second</p></body></html>\n"
    )
    assert mail_text(html_only)[1] == "Hello there\n\nSecond"
    no_text = b"From: d@x.org\nContent-Type: application/octet-stream\n\nAAAA\n"
    assert mail_text(no_text)[1] is None


def _fake_asset(root, name):
    spec = ASSETS[name]
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / MARKER).write_text(json.dumps({"sha256": spec.sha256, "version": spec.version}))
    return root / name


def test_builtin_spam_ham_on_a_synthetic_corpus(tmp_path, caplog):
    folder = _fake_asset(tmp_path, "spam-assassin") / "data"
    for group in ("easy-ham-1", "hard-ham-1", "spam-1"):
        (folder / group).mkdir(parents=True)
    (folder / "easy-ham-1" / "00001.aa.txt").write_bytes(REPLY.replace(b"--=20", b"-- "))
    (folder / "easy-ham-1" / "00002.bb.txt").write_bytes(b"From: JANE@x.org\n\n> only a quote\n")
    (folder / "hard-ham-1" / "00001.cc.txt").write_bytes(
        b"From: Jane <jane@X.org>\n\nMy own words.\n"
    )
    (folder / "spam-1" / "00001.dd.txt").write_bytes(b"From: spam@x.org\n\nBuy now\n")
    recs = load_records("builtin:spam-ham", cache_dir=tmp_path)
    assert [(r.unit, r.doc_id) for r in recs] == [
        ("john.doe@example.com", "easy-ham-1/00001.aa"),
        ("jane@x.org", "hard-ham-1/00001.cc"),
    ]
    assert "1 empty" in caplog.text
    per_message = load_records("builtin:spam-ham", unit="message", cache_dir=tmp_path)
    assert [r.unit for r in per_message] == ["easy-ham-1/00001.aa", "hard-ham-1/00001.cc"]
