"""The dcm4chee-arc LDIF an administrator imports is consistent (no archive runs here).

Checked against what dcm4chee-arc-light's schema requires (dcm4chee-archive.schema: dcmExporter
MUST dcmExporterID, dcmURI, dcmQueueName; dcmExportRule MUST cn, dcmEntity, dcmExporterID):
every entry's RDN is one of its attributes, the rule names the exporter, the exporter's
``dicom:`` URI names the glio-node AE defined in the same file, and the rule only matches
slides that glio-node did not send.
"""

from __future__ import annotations

from pathlib import Path

LDIF = Path(__file__).resolve().parents[2] / "adapters" / "dcm4chee" / "glio-node.ldif"
MUST = {
    "dcmExporter": {"dcmExporterID", "dcmURI", "dcmQueueName"},
    "dcmExportRule": {"cn", "dcmEntity", "dcmExporterID"},
    "dicomDevice": {"dicomDeviceName", "dicomInstalled"},
    "dicomNetworkConnection": {"cn", "dicomHostname"},
    "dicomNetworkAE": {"dicomAETitle", "dicomNetworkConnectionReference", "dicomAssociationAcceptor",
                       "dicomAssociationInitiator"},
}


def entries() -> list[dict[str, list[str]]]:
    """LDIF records as {attribute: [values]}, "dn" included (comments and folding handled)."""
    records, current, lines = [], {}, []
    for raw in LDIF.read_text().splitlines():
        if raw.startswith("#"):
            continue
        if raw.startswith(" ") and lines:
            lines[-1] += raw[1:]
        else:
            lines.append(raw)
    for line in [*lines, ""]:
        if not line.strip():
            if current:
                records.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current.setdefault(key, []).append(value.strip())
    return [r for r in records if "dn" in r]


def test_every_entry_has_what_its_object_classes_require_and_its_rdn():
    records = entries()
    assert len(records) == 6
    for record in records:
        rdn_attr, _, rdn_value = record["dn"][0].split(",")[0].partition("=")
        assert rdn_value in record.get(rdn_attr, []), record["dn"]
        for object_class in record["objectClass"]:
            missing = MUST.get(object_class, set()) - set(record)
            assert not missing, (record["dn"], missing)


def test_the_rule_sends_new_sm_series_to_the_glio_node_ae_and_never_its_results():
    by_class = {oc: r for r in entries() for oc in r["objectClass"]}
    rule, exporter, ae = by_class["dcmExportRule"], by_class["dcmExporter"], by_class["dicomNetworkAE"]
    assert rule["dcmExporterID"] == exporter["dcmExporterID"]
    assert exporter["dcmURI"] == [f"dicom:{ae['dicomAETitle'][0]}"]
    assert rule["dcmEntity"] == ["Series"]
    assert "Modality=SM" in rule["dcmProperty"]
    assert f"SendingApplicationEntityTitle!={ae['dicomAETitle'][0]}" in rule["dcmProperty"]
    assert rule["dcmExportReoccurredInstances"] == ["NEVER"]
    # The exporter and rule live under the archive device, as in dcm4chee's sample config.
    for record in (rule, exporter):
        assert record["dn"][0].endswith(",dicomDeviceName=dcm4chee-arc,cn=Devices,cn=DICOM Configuration,dc=dcm4che,dc=org")
