"""The selected mailbox view: sequence numbers, sequence sets, and the untagged updates."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailserver.imap.selected import SelectedMailbox, compress_uids, flag_list
from mailserver.store.index import FolderState, MessageInfo


def msg(uid: int, flags: tuple[str, ...] = (), modseq: int = 1) -> MessageInfo:
    return MessageInfo(uid, f"b{uid}", f"b{uid}:2,", 100, 1_700_000_000, frozenset(flags), modseq)


def state(*messages: MessageInfo, uidnext: int = 0, modseq: int = 10) -> FolderState:
    top = max((m.uid for m in messages), default=0)
    return FolderState("INBOX", 42, uidnext or top + 1, modseq, tuple(messages))


class HelperTests(SynchronousTestCase):
    def test_flag_list(self) -> None:
        self.assertEqual(flag_list([]), "()")
        self.assertEqual(
            flag_list(["$Label", "\\Seen", "\\Answered", "Work"]),
            "(\\Answered \\Seen $Label Work)",
        )

    def test_compress_uids(self) -> None:
        self.assertEqual(compress_uids([]), "")
        self.assertEqual(compress_uids([5]), "5")
        self.assertEqual(compress_uids([3, 1, 2, 7, 9, 10, 10]), "1:3,7,9:10")


class NumberingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.box = SelectedMailbox(state(msg(3), msg(5), msg(9), msg(12)))

    def test_msn(self) -> None:
        self.assertEqual([self.box.msn(u) for u in (3, 5, 9, 12, 4, 100)], [1, 2, 3, 4, 0, 0])
        self.assertEqual(self.box.exists, 4)

    def test_resolve_sequence_numbers(self) -> None:
        r = self.box.resolve
        self.assertEqual(r([(1, 1)], uid=False), [3])
        self.assertEqual(r([(2, None)], uid=False), [5, 9, 12])
        self.assertEqual(r([(None, 3)], uid=False), [9, 12])  # *:3 is 3:*
        self.assertEqual(r([(4, 2), (1, 1)], uid=False), [3, 5, 9, 12])
        self.assertEqual(r([(None, None)], uid=False), [12])
        self.assertEqual(r([(7, 9)], uid=False), [])

    def test_resolve_uids(self) -> None:
        r = self.box.resolve
        self.assertEqual(r([(4, 10)], uid=True), [5, 9])
        self.assertEqual(r([(1, None)], uid=True), [3, 5, 9, 12])
        # n:* always includes the highest UID, even when n is above it (RFC 3501 §6.4.8).
        self.assertEqual(r([(100, None)], uid=True), [12])
        self.assertEqual(r([(6, 8)], uid=True), [])
        self.assertEqual(SelectedMailbox(state()).resolve([(1, None)], uid=True), [])

    def test_valid_msns(self) -> None:
        self.assertTrue(self.box.valid_msns([(1, 4), (None, 2)]))
        self.assertFalse(self.box.valid_msns([(1, 5)]))
        self.assertFalse(self.box.valid_msns([(0, 1)]))


class UpdateTests(SynchronousTestCase):
    def test_new_mail_gives_exists(self) -> None:
        box = SelectedMailbox(state(msg(1), msg(2)))
        up = box.update(state(msg(1), msg(2), msg(3), msg(4)), True, False)
        # Every EXISTS is followed by RECENT (none claimed here: another session's).
        self.assertEqual(up.lines, [b"* 4 EXISTS\r\n", b"* 0 RECENT\r\n"])
        self.assertEqual(box.resolve([(None, None)], uid=False), [4])

    def test_expunges_highest_first_with_renumbering(self) -> None:
        """EXPUNGE lines use the numbers as they are at the moment each is sent."""
        box = SelectedMailbox(state(msg(1), msg(2), msg(3), msg(4), msg(5)))
        up = box.update(state(msg(1), msg(3), msg(5)), True, False)
        self.assertEqual(up.lines, [b"* 4 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"])
        self.assertEqual(list(box.uids), [1, 3, 5])
        self.assertEqual(up.expunged, [2, 4])

    def test_expunge_held_back_while_not_allowed(self) -> None:
        """During FETCH/STORE/SEARCH the numbers stay; the expunge is told later."""
        box = SelectedMailbox(state(msg(1), msg(2), msg(3)))
        up = box.update(state(msg(1), msg(3), msg(4)), False, False)
        self.assertEqual(up.lines, [b"* 4 EXISTS\r\n", b"* 0 RECENT\r\n"])
        self.assertTrue(up.pending_expunges)
        self.assertEqual(list(box.uids), [1, 2, 3, 4])
        up = box.update(state(msg(1), msg(3), msg(4)), True, False)
        self.assertEqual(up.lines, [b"* 2 EXPUNGE\r\n"])
        self.assertFalse(up.pending_expunges)
        self.assertEqual(list(box.uids), [1, 3, 4])

    def test_flag_change_by_another_session(self) -> None:
        box = SelectedMailbox(state(msg(1), msg(2)))
        up = box.update(state(msg(1), msg(2, ("\\Seen",), 2)), True, False)
        self.assertEqual(up.lines, [b"* 2 FETCH (FLAGS (\\Seen))\r\n"])
        up = box.update(state(msg(1), msg(2, ("\\Seen",), 2)), True, False)
        self.assertEqual(up.lines, [])

    def test_uid_command_and_condstore_fetch_lines(self) -> None:
        box = SelectedMailbox(state(msg(1), msg(2)), condstore=True)
        up = box.update(state(msg(1), msg(2, ("\\Flagged",), 7)), True, True)
        self.assertEqual(up.lines, [b"* 2 FETCH (UID 2 FLAGS (\\Flagged) MODSEQ (7))\r\n"])

    def test_qresync_reports_vanished(self) -> None:
        box = SelectedMailbox(state(msg(1), msg(2), msg(3), msg(4), msg(6)), qresync=True)
        up = box.update(state(msg(4), msg(7)), True, False)
        self.assertEqual(up.lines, [b"* VANISHED 1:3,6\r\n", b"* 2 EXISTS\r\n", b"* 0 RECENT\r\n"])
        self.assertEqual(list(box.uids), [4, 7])

    def test_own_flag_change_not_echoed(self) -> None:
        box = SelectedMailbox(state(msg(1)))
        box.own_flags(msg(1, ("\\Seen",), 3))
        up = box.update(state(msg(1, ("\\Seen",), 3)), True, False)
        self.assertEqual(up.lines, [])


class RecentTests(SynchronousTestCase):
    """\\Recent (RFC 3501 §2.3.2): the messages this session claimed, and only those."""

    def test_claim_marks_the_messages_from_the_first_claimed_uid(self) -> None:
        box = SelectedMailbox(state(msg(1), msg(4), msg(6), msg(9)))
        box.claim(5)
        self.assertEqual(box.recent, {6, 9})
        self.assertEqual(box.flags_of(6), frozenset({"\\Recent"}))
        self.assertEqual(box.flags_of(4), frozenset())
        # A flag change by someone else shows \\Recent with the stored flags.
        up = box.update(state(msg(1), msg(4), msg(6), msg(9, ("\\Seen",), 2)), True, False)
        self.assertEqual(up.lines, [b"* 4 FETCH (FLAGS (\\Recent \\Seen))\r\n"])
        other = SelectedMailbox(state(msg(1), msg(4)))
        other.claim(0)  # nothing claimed
        self.assertEqual(other.recent, set())

    def test_new_mail_claimed_by_this_session_counts_in_recent(self) -> None:
        box = SelectedMailbox(state(msg(1), msg(2)))
        box.claim(1)
        up = box.update(state(msg(1), msg(2), msg(3), msg(4)), True, False, recent_from=3)
        self.assertEqual(up.lines, [b"* 4 EXISTS\r\n", b"* 4 RECENT\r\n"])
        self.assertEqual(box.recent, {1, 2, 3, 4})
        # Claimed from UID 6 on: UID 5 is another session's.
        up = box.update(state(*(msg(u) for u in range(1, 7))), True, False, recent_from=6)
        self.assertEqual(up.lines, [b"* 6 EXISTS\r\n", b"* 5 RECENT\r\n"])
        self.assertNotIn(5, box.recent)

    def test_expunge_of_a_recent_message_tells_the_new_count(self) -> None:
        """As Dovecot: RECENT again when an expunge changed it, not when it did not."""
        box = SelectedMailbox(state(msg(1), msg(2), msg(3)))
        box.claim(2)
        up = box.update(state(msg(2), msg(3)), True, False)
        self.assertEqual(up.lines, [b"* 1 EXPUNGE\r\n"])
        up = box.update(state(msg(3)), True, False)
        self.assertEqual(up.lines, [b"* 1 EXPUNGE\r\n", b"* 1 RECENT\r\n"])
        self.assertEqual(box.recent, {3})
        # Held back (FETCH, STORE, SEARCH): neither the EXPUNGE nor the count changes.
        up = box.update(state(), False, False)
        self.assertEqual(up.lines, [])
        self.assertEqual(box.recent, {3})


class KeywordTests(SynchronousTestCase):
    """FLAGS lists the keywords in use and is sent again before a new one shows (§7.2.6)."""

    def test_flags_and_permanentflags_list_the_keywords(self) -> None:
        box = SelectedMailbox(state(msg(1, ("$Work", "\\Seen")), msg(2, ("Later",))))
        self.assertEqual(
            box.flags_lines(),
            [
                b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work Later)\r\n",
                b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work Later"
                b" \\*)] Flags permitted\r\n",
            ],
        )
        examined = SelectedMailbox(state(msg(1)), read_only=True)
        self.assertEqual(examined.flags_lines()[1], b"* OK [PERMANENTFLAGS ()] Flags permitted\r\n")

    def test_a_new_keyword_from_another_session_is_announced_before_its_fetch(self) -> None:
        box = SelectedMailbox(state(msg(1), msg(2)))
        up = box.update(state(msg(1), msg(2, ("$New",), 2)), True, False)
        self.assertEqual(
            up.lines,
            [
                b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $New)\r\n",
                b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $New \\*)]"
                b" Flags permitted\r\n",
                b"* 2 FETCH (FLAGS ($New))\r\n",
            ],
        )
        # Known now: the same keyword on another message is just a FETCH.
        up = box.update(state(msg(1, ("$New",), 3), msg(2, ("$New",), 2)), True, False)
        self.assertEqual(up.lines, [b"* 1 FETCH (FLAGS ($New))\r\n"])
        # A new message with a new keyword: FLAGS before its EXISTS.
        up = box.update(
            state(msg(1, ("$New",), 3), msg(2, ("$New",), 2), msg(3, ("Other",))), True, False
        )
        self.assertEqual(up.lines[0][:8], b"* FLAGS ")
        self.assertIn(b" Other)", up.lines[0])
        self.assertEqual(up.lines[2:], [b"* 3 EXISTS\r\n", b"* 0 RECENT\r\n"])
        self.assertEqual(box.learn_keywords(["Other", "\\Seen"]), [])
