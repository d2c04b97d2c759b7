{{/*
Names, labels and addresses every template shares. Object names are fixed,
not derived from the release: the services' configuration, the overlays and
the runbook name them, so one release per namespace.
*/}}

{{- define "minitoolstream.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object: the system it belongs to, and Helm's release labels
unless plain manifests are rendered (helmManaged false).
*/}}
{{- define "minitoolstream.labels" -}}
app.kubernetes.io/part-of: minitoolstream
{{- if .Values.helmManaged }}
helm.sh/chart: {{ include "minitoolstream.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: a digest wins, an empty
tag is the chart's appVersion. Called with (dict "image" ... "root" $).
*/}}
{{- define "minitoolstream.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .root.Chart.AppVersion }}
{{- end }}
{{- end }}

{{- define "minitoolstream.secretName" -}}
{{ .Values.secret.existingSecret | default "minitoolstream-secrets" }}
{{- end }}

{{/* The in-cluster suffix of a Service name: NAMESPACE.svc.DOMAIN. */}}
{{- define "minitoolstream.svcDomain" -}}
{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{/* Every Tarantool member's address, comma-separated. */}}
{{- define "minitoolstream.tarantoolMembers" -}}
{{- $members := list }}
{{- range $i := until (int .Values.tarantool.replicas) }}
{{- $members = append $members (printf "tarantool-%d.tarantool-service.%s:3301" $i (include "minitoolstream.svcDomain" $)) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{- define "minitoolstream.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
minio-service.{{ include "minitoolstream.svcDomain" . }}:9000
{{- else -}}
{{ required "externalS3.endpoint: the S3 service's host[:port] is required when minio.enabled is false" .Values.externalS3.endpoint }}
{{- end }}
{{- end }}

{{/*
The pod and container security settings of every pod: uid/gid 1000 is the
project's fixed runtime user (the images' nonroot user) and owns the volumes.
*/}}
{{- define "minitoolstream.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "minitoolstream.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* imagePullSecrets, nodeSelector and tolerations of a pod spec. */}}
{{- define "minitoolstream.podPlacement" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A Job's hook annotations under Helm: Jobs cannot be changed in place, so the
Job is made again after each install and upgrade.
*/}}
{{- define "minitoolstream.jobHook" -}}
{{- if .Values.helmManaged }}
helm.sh/hook: post-install,post-upgrade
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget's minAvailable must leave a pod to evict. */}}
{{- define "minitoolstream.checkPdb" -}}
{{- $min := .pdb.minAvailable }}
{{- if and .pdb.enabled (not (kindIs "string" $min)) (ge (int $min) (int .fewest)) }}
{{- fail (printf "%s.pdb.minAvailable (%v) must be below its fewest replicas (%v): it would block every node drain" .name $min .fewest) }}
{{- end }}
{{- end }}

{{/* A StatefulSet volume claim. */}}
{{- define "minitoolstream.volumeClaim" -}}
- metadata:
    name: data
  spec:
    accessModes:
      - ReadWriteOnce
    {{- with .storageClassName }}
    storageClassName: {{ . }}
    {{- end }}
    resources:
      requests:
        storage: {{ .size }}
{{- end }}

{{/*
An autoscaler's behavior ({scaleUp, scaleDown}, each with
stabilizationWindowSeconds, selectPolicy and policies), for the HPA and
KEDA's ScaledObject alike.
*/}}
{{- define "minitoolstream.hpaBehavior" -}}
{{- range $direction := list "scaleUp" "scaleDown" }}
{{- with index $ $direction }}
{{ $direction }}:
  {{- with .stabilizationWindowSeconds }}
  stabilizationWindowSeconds: {{ . }}
  {{- end }}
  {{- with .selectPolicy }}
  selectPolicy: {{ . }}
  {{- end }}
  {{- with .policies }}
  policies:
    {{- range . }}
    - type: {{ .type }}
      value: {{ .value }}
      periodSeconds: {{ .periodSeconds }}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}
