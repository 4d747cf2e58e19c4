{{- define "tang.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tang.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tang.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tang.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tang.labels" -}}
{{ include "tang.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tang.secretName" -}}
{{- if .Values.keys.existingSecret -}}
{{- .Values.keys.existingSecret -}}
{{- else -}}
{{- printf "%s-keys" (include "tang.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tang.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tang.headless" -}}
{{- printf "%s-headless" (include "tang.fullname" .) -}}
{{- end -}}

{{- define "tang.serviceUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "tang.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}
