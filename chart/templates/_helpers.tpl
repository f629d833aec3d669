{{- define "podgpu.labels" -}}
app.kubernetes.io/name: podgpu
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "podgpu.selector" -}}
app.kubernetes.io/name: podgpu
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
