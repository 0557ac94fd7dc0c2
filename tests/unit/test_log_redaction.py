"""Log lines of failed jobs name no UIDs: the reader's messages carry spool paths made of them."""

from glio_node.redact import without_uids


def test_uids_in_spool_paths_are_replaced_and_versions_and_statuses_kept():
    path = (
        "/srv/spool/instances/1.2.826.0.1.3680043.8.498.1/2.25.333728254786794636001756910208"
        "/2.25.204293893555282190054452098113298426540.dcm"
    )
    text = f"{path}: a concatenation of 3 instances arrived with only 2 (bundle 1.0.0, 0xA700)"
    assert without_uids(text) == (
        "/srv/spool/instances/<uid>/<uid>/<uid>.dcm: a concatenation of 3 instances arrived "
        "with only 2 (bundle 1.0.0, 0xA700)"
    )
