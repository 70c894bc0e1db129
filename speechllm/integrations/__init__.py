"""Adapters to other frameworks. Each submodule imports its framework, and nothing else in the
package imports one: `speechllm.integrations.pipecat` needs `pip install -e '.[pipecat]'`."""
