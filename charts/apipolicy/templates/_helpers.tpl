{{/*
Fixed names, so they do not follow the release name (one release per cluster):
- operatorName: the Deployment, ServiceAccount, RBAC and the Service, whose name the chart
  passes to the operator as APIPOLICY_SERVICE_NAME (the same as the operator's default).
- webhookName: the MutatingWebhookConfiguration, passed as APIPOLICY_WEBHOOK_CONFIGURATION
  (the operator's default, webhook::CONFIGURATION).
- leaseName and tlsSecretName are fixed in the operator's code (leader::LEASE, certs::SECRET):
  no flag changes them, so RBAC names them as the code does.
*/}}
{{- define "apipolicy.operatorName" -}}apipolicy-operator{{- end -}}
{{- define "apipolicy.webhookName" -}}apipolicy-injector{{- end -}}
{{- define "apipolicy.leaseName" -}}apipolicy-operator{{- end -}}
{{- define "apipolicy.tlsSecretName" -}}apipolicy-operator-tls{{- end -}}

{{- define "apipolicy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "apipolicy.labels" -}}
helm.sh/chart: {{ include "apipolicy.chart" . }}
app.kubernetes.io/part-of: apipolicy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "apipolicy.selectorLabels" -}}
app.kubernetes.io/name: apipolicy-operator
app.kubernetes.io/component: operator
{{- end -}}

{{- define "apipolicy.operatorLabels" -}}
{{ include "apipolicy.labels" . }}
{{ include "apipolicy.selectorLabels" . }}
{{- end -}}

{{- define "apipolicy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "apipolicy.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "apipolicy.image" -}}
{{- $i := .Values.image -}}
{{- if $i.digest -}}
{{- printf "%s@%s" $i.repository $i.digest -}}
{{- else -}}
{{- printf "%s:%s" $i.repository (default .Chart.AppVersion $i.tag) -}}
{{- end -}}
{{- end -}}

{{- define "apipolicy.sidecarImage" -}}
{{- $s := .Values.sidecar.image -}}
{{- $repo := default .Values.image.repository $s.repository -}}
{{- $digest := $s.digest -}}
{{- if and (not $digest) (eq $repo .Values.image.repository) -}}
{{- $digest = .Values.image.digest -}}
{{- end -}}
{{- if $digest -}}
{{- printf "%s@%s" $repo $digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default (default .Chart.AppVersion .Values.image.tag) $s.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Certificate (and its Secret) cert-manager issues for the webhook and agent API. */}}
{{- define "apipolicy.certificateName" -}}apipolicy-operator-serving{{- end -}}
