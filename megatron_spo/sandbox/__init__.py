"""SandboxFusion-compatible isolated code execution server and its client tool."""
