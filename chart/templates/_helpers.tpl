{{- define "podgpu.labels" -}}
app.kubernetes.io/name: podgpu
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "podgpu.selector" -}}
app.kubernetes.io/name: podgpu
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podgpu.tlsArgs" -}}
{{- if .Values.tls.secretName -}}
- --tls-cert=/etc/podgpu-tls/tls.crt
- --tls-key=/etc/podgpu-tls/tls.key
{{- if .Values.tls.requireClientCert }}
- --tls-client-ca=/etc/podgpu-tls/ca.crt
{{- end }}
{{- end -}}
{{- end -}}

{{/* The peer allowed to the HTTP port: the selected scrapers (Prometheus's
pods unless metricsPodSelector names others) in the selected namespaces. */}}
{{- define "podgpu.metricsPeer" -}}
- namespaceSelector: {{- toYaml .Values.networkPolicy.metricsNamespaceSelector | nindent 4 }}
  {{- if not .Values.networkPolicy.metricsFromEveryPod }}
  podSelector: {{- toYaml (.Values.networkPolicy.metricsPodSelector | default (dict "matchLabels" (dict "app.kubernetes.io/name" "prometheus"))) | nindent 4 }}
  {{- end }}
{{- end -}}
