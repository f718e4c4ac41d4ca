"""The llm-d router's EndpointPickerConfig as a JSON schema, for checking epp.yaml.

Written from the Go types the endpoint picker decodes its config file into, at llm-d
router v0.10.0 (the version deploy/README.md names): `apix/config/v1alpha1`
(EndpointPickerConfig, PluginSpec, SchedulingProfile, DataLayerConfig...) and, for the
plugins deploy/k8s uses, the parameter structs of their factories. The picker parses
plugin parameters strictly since v0.9 (an unknown field fails the plugin), so these
schemas refuse unknown fields too. Plugins whose factories ignore parameters get none.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]
API_VERSION = "llm-d.ai/v1alpha1"


def shape(required: list[str], **properties: Any) -> Schema:
    """An object with these properties and no others."""
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


TEXT = {"type": "string", "minLength": 1}
REF = shape(["pluginRef"], pluginRef=TEXT)
NO_PARAMETERS = {"not": {}}
"""A plugin whose factory takes no parameters: the key must be absent."""

PLUGIN_PARAMETERS: dict[str, Schema] = {
    # pkg/epp/framework/plugins/datalayer/source/metrics (metricsDatasourceParams)
    "metrics-data-source": shape(
        [],
        scheme={"enum": ["http", "https"]},
        path={"type": "string", "pattern": "^/"},
        port={"type": "integer", "minimum": 1, "maximum": 65535},
        insecureSkipVerify={"type": "boolean"},
        caCertPath=TEXT,
        clientCertPath=TEXT,
        clientKeyPath=TEXT,
        interval=TEXT,
    ),
    # pkg/epp/framework/plugins/datalayer/extractor/metrics (modelServerExtractorParams)
    "core-metrics-extractor": shape(
        [], engineLabelKey=TEXT, defaultEngine=TEXT, engineConfigs={"type": "array"}
    ),
    # pkg/epp/framework/plugins/scheduling/picker (PickerParameters)
    "max-score-picker": shape([], maxNumOfEndpoints={"type": "integer", "minimum": 1}),
    "lora-affinity-scorer": NO_PARAMETERS,
    "queue-scorer": NO_PARAMETERS,
    "kv-cache-utilization-scorer": NO_PARAMETERS,
    "single-profile-handler": NO_PARAMETERS,
}
"""The plugin types deploy/k8s may use, each with the parameters its factory decodes."""

PLUGIN = {
    "oneOf": [
        shape(["type"], type={"const": kind}, name=TEXT, parameters=parameters)
        for kind, parameters in PLUGIN_PARAMETERS.items()
    ]
}

ENDPOINT_PICKER_CONFIG = shape(
    ["apiVersion", "kind", "plugins", "schedulingProfiles"],
    apiVersion={"const": API_VERSION},
    kind={"const": "EndpointPickerConfig"},
    featureGates={"type": "array", "items": TEXT},
    plugins={"type": "array", "minItems": 1, "items": PLUGIN},
    schedulingProfiles={
        "type": "array",
        "minItems": 1,
        "items": shape(
            ["name", "plugins"],
            name=TEXT,
            plugins={
                "type": "array",
                "items": shape(["pluginRef"], pluginRef=TEXT, weight={"type": "number"}),
            },
        ),
    },
    dataLayer=shape(
        [],
        injectDefaults={"type": "boolean"},
        sources={
            "type": "array",
            "items": shape(
                ["pluginRef", "extractors"],
                pluginRef=TEXT,
                extractors={"type": "array", "items": REF},
            ),
        },
        discovery=REF,
        crossReplicaSyncerPluginRef=TEXT,
        crossReplicaSyncInterval=TEXT,
    ),
    flowControl={"type": "object"},
    requestHandler=shape([], parsers={"type": "array", "items": REF}),
)
