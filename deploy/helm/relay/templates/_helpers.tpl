{{- define "relay.fullname" -}}
{{- printf "%s-relay" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "relay.labels" -}}
app.kubernetes.io/name: relay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "relay.secretName" -}}
{{- if .Values.existingSecret -}}{{ .Values.existingSecret }}{{- else -}}{{ include "relay.fullname" . }}{{- end -}}
{{- end -}}

{{- /* The Deployments to render, by name: the five services, or the one embedded pod. */}}
{{- define "relay.services" -}}
{{- if eq .Values.mode "embedded" -}}
{{ dict "all" .Values.embedded | toYaml }}
{{- else -}}
{{ .Values.services | toYaml }}
{{- end -}}
{{- end -}}

{{- define "relay.env" -}}
envFrom:
  - secretRef:
      name: {{ include "relay.secretName" . }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}
